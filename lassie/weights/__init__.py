"""The weights directory, torch-free: its layout and checks (`layout`), setup's fetch of what is missing from tars
(`provision`) or the hub (`hub`), the Lassie LoRA (`lassie_lora`), the provenance record (`manifest`) and a folder from
one tar (`downloads`). May import `lassie.fetch`, `lassie.request` and `lassie.settings`; nothing is re-exported here:
callers import the module that does the job.
"""
