"""Errors that mean "the user's input is wrong" (exit code 2, one line, no traceback)."""


class BadInput(Exception):
    """Bad config, file, URL, video or annotation. The message is one line that names what is
    wrong (the key, the file, the video id) and what to do about it."""
