module github.com/expertmesh/expertmesh/kernels/_asm

go 1.26
