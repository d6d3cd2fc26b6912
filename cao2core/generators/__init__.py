"""What a generator plugin author reads: the hook specifications and the contract's types (``hookspecs``), the host
that discovers plugins and calls their hooks (``host``), the checks of every hook's return (``contract``), the
conformance kit for a plugin's own tests (``conformance``), and the helpers plugins share: ``precision``,
``compiling``, ``respacing``, ``weights`` (checkpoint loading and hashing) and ``seeding``."""
