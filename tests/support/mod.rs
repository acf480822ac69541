//! Starting the real binary and talking to it.
