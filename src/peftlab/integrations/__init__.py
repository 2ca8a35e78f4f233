"""Adapters inside other frameworks: transformers' ``Trainer`` (:mod:`.trainer`) and FSDP (:mod:`.fsdp`)."""
