//! Host-side stub: the programs live in the `scopegate` binary target for the bpf target.
//! This library target exists so the agent can name this crate as a build dependency and
//! be rebuilt when it changes.
#![no_std]
