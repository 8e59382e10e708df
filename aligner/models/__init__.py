"""Models: megatron-core GPTModel builder (:mod:`.gpt`), its config (:mod:`.config`),
the fused LM head for training steps (:mod:`.lm_head`), building a run's models from
its config (:mod:`.loading`), weight sharding (:mod:`.sharding`) and Hugging Face
import/export (:mod:`.hf`).

Submodules are imported on use: megatron-core and transformers take seconds to import.
"""
