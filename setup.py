"""Package build. Pure Python for now: `pip install -e .` compiles nothing."""
from setuptools import setup

setup()
