"""Will a conversion fit: each route's peak memory estimated from config.json, against the room this process has."""
