package coordinator_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log"
	"net/http"
	"os"

	"github.com/expertmesh/expertmesh/attnnode"
	"github.com/expertmesh/expertmesh/coordinator"
	"github.com/expertmesh/expertmesh/model"
)

// Serve a tiny random model in one process and ask it for a completion.
func Example() {
	dir, _ := os.MkdirTemp("", "example-")
	defer os.RemoveAll(dir)
	p, _ := model.IsPreset("tiny-v2")
	if err := model.GenerateCheckpoint(dir, p, model.GenOptions{Seed: 1}); err != nil {
		log.Fatal(err)
	}
	ncfg := attnnode.DefaultConfig()
	ncfg.ModelDir, ncfg.Threads, ncfg.CacheBytes = dir, 1, 1<<20
	ncfg.ListenAddr = "" // in-process: no gRPC
	node, err := attnnode.Start(context.Background(), ncfg)
	if err != nil {
		log.Fatal(err)
	}
	defer node.Close()

	cfg := coordinator.DefaultConfig()
	cfg.ModelDir, cfg.Addr = dir, "127.0.0.1:0"
	c, err := coordinator.Start(context.Background(), cfg, map[string]coordinator.AttentionNode{"serve": node})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	<-c.Ready()

	body, _ := json.Marshal(map[string]any{"prompt": []int{1, 2, 3}, "max_tokens": 4, "temperature": 0, "ignore_eos": true})
	resp, err := http.Post("http://"+c.Addr()+"/v1/completions", "application/json", bytes.NewReader(body))
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
	var out struct {
		Choices []struct {
			TokenIDs     []int  `json:"token_ids"`
			FinishReason string `json:"finish_reason"`
		} `json:"choices"`
		Usage struct {
			TotalTokens int `json:"total_tokens"`
		} `json:"usage"`
	}
	json.NewDecoder(resp.Body).Decode(&out)
	fmt.Println(resp.StatusCode, len(out.Choices[0].TokenIDs), out.Choices[0].FinishReason, out.Usage.TotalTokens)
	// Output: 200 4 length 7
}
