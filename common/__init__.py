"""What every package shares and none owns: user-facing errors, setting checks, safe output files, device choice,
image reading.

It imports nothing of ours, so segment, stylize and pipeline can all use it without depending on each other.
"""
