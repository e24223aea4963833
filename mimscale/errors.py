"""Errors a user can cause. The CLI prints one line for these and exits 2; nothing else is caught."""


class MimscaleError(Exception):
    """Base class: bad input from the user (config, data, checkpoint, launch environment)."""


class ConfigError(MimscaleError):
    """An unknown key, a wrong type or an impossible combination in the config."""


class DataError(MimscaleError):
    """Missing shards, an unreadable manifest, a data source that cannot feed the requested ranks."""


class CheckpointError(MimscaleError):
    """A truncated, corrupt or mismatched checkpoint."""


class LaunchError(MimscaleError):
    """An inconsistent launcher environment (world size, ranks, master address)."""


class NonFiniteError(MimscaleError):
    """Training diverged: too many non-finite losses or gradients in a row (train.on_nonfinite=stop)."""
