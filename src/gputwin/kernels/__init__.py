"""The fused paths of the fast engine, shared by the trainer and the validator: fused LoRA Linear, rotary
embeddings and RMSNorm, the packed (varlen) decoder, and the checks that each computes what transformers and
peft compute. Imports torch; nothing here knows about arms, events or validation."""
