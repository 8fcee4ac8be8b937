# llama.cpp's libraries must load before numpy's OpenBLAS: the other way round, loading a model onto a CUDA GPU
# segfaults (seen on an H200 with llama-cpp-python 0.3.36 and numpy 2.4 and 2.5, in `llama_model_load_from_file`).
# Every process (worker, daphne, manage.py, tests) imports this package before anything that imports numpy.
import llama_cpp  # noqa: F401

from .celery import app as celery_app

__all__ = ["celery_app"]
