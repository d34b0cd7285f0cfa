"""Adapters that plug the package's attention into other libraries (each needs its library: an optional extra).

* :mod:`freeatten_core.integrations.transformers`: Hugging Face ``transformers`` (extra ``hf``).

The core package never imports these libraries; import an adapter module explicitly.
"""
