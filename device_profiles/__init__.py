"""Device profiles: data files, installed as ``edgemed.device_profiles`` (no code lives here)."""
