"""Output paths of the experiment scripts, refused in one line before any work (not part of the paper).

claims.py, sweep.py and kinds.py write a work folder and a markdown report; a path that cannot take them
(an existing folder where a file goes, a file where a folder goes, a parent that is a file or not writable)
used to fail with a traceback after minutes or hours of training. Each script calls this on its flags first.
"""
import os


def output_error(flag, path, folder=False):
    """Why `path` cannot be written as a folder (folder=True) or a file, in one line naming `flag`; None when it
    can. On success the folder (or the file's parent folder) exists afterwards."""
    if folder and os.path.exists(path) and not os.path.isdir(path):
        return f"{flag} {path} exists and is not a folder"
    if not folder and os.path.isdir(path):
        return f"{flag} {path} is a folder; give a file name, e.g. {os.path.join(path, 'RESULTS.md')}"
    target = os.path.abspath(path) if folder else os.path.dirname(os.path.abspath(path))
    parent = target
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{flag} {path}: {parent} is a file, not a folder"
    if not os.access(parent, os.W_OK):
        return f"{flag} {path}: cannot write under {parent}"
    try:   # made now, not after the run: a folder that cannot be created (e.g. under /proc) fails here
        os.makedirs(target, exist_ok=True)
    except OSError as e:
        return f"{flag} {path}: cannot create {target} ({e.strerror})"
    return None
