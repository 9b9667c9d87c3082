"""Two versions: the package's, and the wire protocol's (they change independently)."""

__version__ = "0.1.0"

#: The pool protocol version sent in (and required from) the handshake by default.
#: A protocol constant, not the package version: it changes only when the wire
#: changes. algocline's workers answer the handshake with their crate version and
#: require an exact match; our wire is the one algocline's pool module speaks as of
#: its 0.31.0 release (``crates/algocline-app/src/pool/protocol.rs``: the request,
#: response and ``FeedResult`` shapes, the mismatch text). Workers of other releases
#: are reached with ``PoolClient.connect(..., version="auto")``.
PROTOCOL_VERSION = "0.31.0"
