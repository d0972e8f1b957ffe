"""The public entry points' examples (their docstrings' Examples sections) run as written."""

import doctest

import pytest

import geometry

PUBLIC = ["analyze", "load", "Run", "Analysis", "AnalysisConfig", "Recorder", "RecorderConfig", "GeometryCallback",
          "GradientProjectionCallback"]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_docstring_has_a_reference_and_its_examples_run(name):
    obj = getattr(geometry, name)
    doc = obj.__doc__ or ""
    assert "Examples" in doc and ">>>" in doc, f"{name} has no Examples section"
    tests = doctest.DocTestFinder(recurse=False).find(obj, name, globs={})
    assert tests and tests[0].examples
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
