"""Ray Tune architecture searches (`cvlab tune`): the search space, the search's driver process (`tune`), one
trial, callbacks, the summary report, and `cvlab compare`."""
