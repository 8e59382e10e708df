"""Models: megatron-core GPTModel builder (:mod:`.gpt`), its config (:mod:`.config`),
weight sharding (:mod:`.sharding`), Hugging Face import/export (:mod:`.hf`) and the
CPU compatibility shim (:mod:`.megatron_cpu`).

Submodules are imported on use: megatron-core and transformers take seconds to import.
"""
