"""Ray Tune architecture searches (`cvlab tune`): the search space, the driver, one trial, callbacks, the summary
report, and `cvlab compare`."""
