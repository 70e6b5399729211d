"""Bundles: pack a model into a verifiable, signed, self-describing package; install and run it by name.

    manifest.py  the one versioned schema (files, model facts, provenance, card, memory)
    digest.py    hash-while-copy, and the verified cache behind the fast path (``files.hashing`` hashes)
    facts.py     model facts read from the GGUF (or ONNX config) and the memory estimate
    card.py      the model card fields (CHAI applied model card / ONC HTI-1 source attributes)
    signing.py   EC keys; model.sig in the OpenSSF Model Signing format through model-signing, offline
                 (an older edgemed's ed25519 manifest.sig still verifies, read-only)
    trust.py     $EDGEMED_HOME/trust.toml: which signers a device accepts, per registry or repository
    home_move.py moving a state folder an earlier edgemed left in ~/.cache into the data folder
    bundle.py    pack a bundle (directory or tar) and verify a bundle directory
    archive.py   write the tar form; read untrusted tars safely, streaming
    store.py     the local content-addressed model store: install, list, remove, rollback, verify by name
    ref.py       what a MODEL / BUNDLE argument names (``ModelRef``): the one resolver every command
                 (run, chat, serve, bench, devices, verify) and every test uses
    export.py    Ollama Modelfile and llama-server command line
    oci*.py      push / pull bundles through an OCI registry as CNCF ModelPack artifacts (oras for the protocol)

Imports flow one way: cli -> packaging -> {runtime, devices, formats, files, env, errors}; inside it,
ref -> store -> bundle -> digest -> manifest. Nothing here imports
the converters or torch; gguf and cryptography are imported inside the functions that need them.
"""
