"""The benchmark harness behind ``edgemed bench``: per-configuration measurements in their own processes,
medical accuracy, roofline, resumable results and reports."""
