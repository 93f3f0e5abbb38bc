"""Timings of the course and its grader (see each script's docstring). A package, so that
``benchmarks.grading_throughput`` is this folder's module and not the top-level ``benchmarks``
package that Opacus installs into site-packages."""
