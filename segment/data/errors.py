"""Dataset errors users can cause (missing or malformed files); each carries a one-line message naming the culprit."""
from segment.errors import SegmentError


class DatasetError(SegmentError):
    """A dataset file or folder is missing, unreadable or malformed."""
