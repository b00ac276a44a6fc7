"""Output paths of the experiment scripts, refused in one line before any work (not part of the paper).

claims.py writes a work folder and a markdown report, kinds.py a classifier cache; a path that cannot take them
(an existing folder where a file goes, a file where a folder goes, a parent that is a file or not writable)
would fail with a traceback after minutes of training. Each script calls this on its flags first.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pages import images  # noqa: E402


def output_error(flag, path, folder=False):
    """Why `path` cannot be written as a folder (folder=True) or a file, in one line naming `flag`; None when it
    can. Nothing is left behind (images.folder_error): the scripts make their folders when they write."""
    if folder and os.path.exists(path) and not os.path.isdir(path):
        return f"{flag} {path} exists and is not a folder"
    if not folder and os.path.isdir(path):
        return f"{flag} {path} is a folder; give a file name, e.g. {os.path.join(path, 'RESULTS.md')}"
    why = images.folder_error(path if folder else os.path.dirname(os.path.abspath(path)))
    return f"{flag} {path}: {why}" if why else None
