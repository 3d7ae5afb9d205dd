"""The request, pure and torch-free: the schema's bounds (`bounds`), output sizes (`sizes`, with
`sizes.json`), the request and its validated plan (`plan`), the field-named error (`errors`), user
images (`images`), the input files a request may use (`input_files`) and the outputs' encoding
(`encoding`).

May import: nothing of lassie but `lassie.request` itself, so every other package can use it and a
test can check it without torch. Nothing is re-exported here: callers import the module that does
the job.
"""
