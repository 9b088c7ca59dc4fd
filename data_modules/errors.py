"""The one exception type of the data layer."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input on disk: a missing folder, an unpaired image, an unreadable file, an empty category.

    The message always names the file or folder and what was expected.
    """
