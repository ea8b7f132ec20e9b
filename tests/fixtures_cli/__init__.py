"""Task modules that tests/test_cli_worker.py hands to ``trioworker worker`` subprocesses."""
