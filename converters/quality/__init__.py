"""Does the output still compute what the source did: the layer-at-a-time reference, parity, and the fidelity figures (KLD, top-1)."""
