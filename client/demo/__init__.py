"""The demo job (``embps demo``) and what it is built from: a local PS launcher, the
DLRM model and the report. Not part of the trainer library: nothing there imports it."""
