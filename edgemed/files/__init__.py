"""Safe file output and local state: atomic writes, what edgemed made (and may therefore remove), debris of killed runs, locked JSON state files, content hashes."""
