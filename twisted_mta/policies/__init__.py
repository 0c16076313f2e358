"""The built-in policy plugins: each a module here, registered in
``twisted/plugins/`` like any third party's, and documented in
``docs/plugins/``.  They use only :mod:`twisted_mta.interfaces` and the
pure mail formats, as a third-party plugin would."""
