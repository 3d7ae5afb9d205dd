"""The weights directory, torch-free: its layout, what is missing and what is damaged (`layout`),
setup's fetch of what is missing and folders from tars (`provision`) or the hub (`hub`), the Lassie
LoRA's one resolution and install path (`lassie_lora`), the provenance record (`manifest`), and a
weights folder from one tar (`downloads`).

May import: `lassie.fetch`, `lassie.request` and `lassie.settings`. Nothing is re-exported here:
callers import the module that does the job.
"""
