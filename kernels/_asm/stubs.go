package main

func genMatMul(g *gen) {}
func genVec(g *gen)    {}
