// Package safetensors reads and writes HuggingFace safetensors checkpoints.
//
// A safetensors file is an 8-byte little-endian header length, a JSON header
// mapping tensor names to dtype, shape and byte range, and the raw
// little-endian tensor bytes. A large model is split into shards tied together
// by model.safetensors.index.json.
//
// Reading never copies weights: each file is memory-mapped read-only (on unix;
// elsewhere read into one buffer) and a Tensor's Data is a view into that
// mapping, so only the pages a node touches are read from disk, and every
// process on a machine shares one copy in the page cache. An expert node that
// owns a few experts thus reads only their bytes; Checkpoint.Prefetch starts
// that read early. Headers and indexes are validated completely at open
// (ParseHeader documents the rules), so a damaged checkpoint fails at start-up
// with an error naming the file and tensor, never later with a panic.
//
// Writing (WriteSharded, WriteFile) streams tensors one at a time through a
// caller's fill function, so multi-gigabyte checkpoints are generated with
// memory for one tensor, and publishes files by rename so a failed write never
// leaves a checkpoint that looks complete.
package safetensors
