"""What every exercise's check shares: Fail, and loading the file being checked.

A check is a function check(path) in exercises/NN_name/check.py. It raises Fail with a message that
says what was expected and what came back, or returns a short note for the PASS line.
"""
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)                               # the project's modules: model, partition, ...


class Fail(Exception):
    """The file being checked does not do what the exercise asks; the message says how."""


def load(path, name="student"):
    """Import a Python file by path, as module `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
