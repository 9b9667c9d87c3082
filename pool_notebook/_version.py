"""The package version, which is also the default protocol version spoken on the wire."""

__version__ = "0.1.0"

#: The version sent in (and required from) the handshake by default. It equals the
#: package version so the bundled worker always matches; real algocline workers speak
#: their own release's version and need ``version=...`` on connect.
PROTOCOL_VERSION = __version__
