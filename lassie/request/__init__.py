"""The request, pure and torch-free: the schema's bounds, output sizes, the validated plan, the field-named error, user
images, and the outputs' encoding and folders. May import nothing of lassie but `lassie.request` itself, so every
package can use it and a test can check it without torch. Nothing is re-exported: callers import the module needed."""
