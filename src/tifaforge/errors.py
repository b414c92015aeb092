"""The one exception type users see as a one-line error (the CLI prints it and exits non-zero)."""


class TifaError(Exception):
    """A problem with the user's input or environment, worded for the user.

    The message names the file (and line and field where known) and the problem; the CLI prints
    `tifa: error: <message>` and exits with status 2, without a traceback.
    """


class ConfigError(TifaError):
    """A config file with an unknown key, a value of the wrong type, or a value out of range."""


class MissingExtraError(TifaError, ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""


def os_error_line(e: OSError) -> str:
    """One line for an OSError a user can cause (disk full, permissions, a file where a folder goes),
    naming the path and what to do; the work already written stays (checkpoints are marked complete
    last, outputs are swapped in whole), so the same command with --resume goes on."""
    import errno

    where = f"{e.filename}: " if e.filename else ""
    what = {
        errno.ENOSPC: "no space left on the device: free some space, then rerun the same command (training "
                      "goes on from its last complete checkpoint with --resume)",
        errno.EDQUOT: "disk quota exceeded: free some space, then rerun the same command",
        errno.EFBIG: "file too large for the file system (or the process's file-size limit)",
        errno.EACCES: "permission denied: choose a folder you can write to, or fix its permissions",
        errno.EPERM: "operation not permitted: choose a folder you can write to, or fix its permissions",
        errno.EROFS: "read-only file system: choose an output folder on a writable disk",
        errno.ENOTDIR: "a path component is a file, not a folder: choose another output path",
        errno.EEXIST: "a file is in the way (a folder is needed there): choose another output path",
        errno.EISDIR: "is a folder, a file is needed there",
        errno.ENAMETOOLONG: "file name too long",
    }.get(e.errno, e.strerror or str(e))
    return where + what
