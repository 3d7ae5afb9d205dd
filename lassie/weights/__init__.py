"""The weights directory, torch-free: its layout and what is missing from it (`layout`), fetching
what is missing (`provision`), the Lassie LoRA's one resolution and install path (`lassie_lora`),
the provenance record (`manifest`), and a weights folder from one tar (`downloads`).

May import: `lassie.fetch`, `lassie.request` and `lassie.settings`. Nothing is re-exported here:
callers import the module that does the job.
"""
