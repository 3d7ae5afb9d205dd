"""The weights directory, torch-free: its layout and what is missing from it (`layout`), fetching
what is missing and the Lassie LoRA (`provision`), and a weights folder from one tar (`downloads`).

May import: `lassie.fetch`, `lassie.request` and `lassie.settings`. Nothing is re-exported here:
callers import the module that does the job.
"""
