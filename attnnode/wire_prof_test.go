package attnnode

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/expertmesh/expertmesh/internal/wire"

	"github.com/expertmesh/expertmesh/model"
	"github.com/expertmesh/expertmesh/placement"
	meshpb "github.com/expertmesh/expertmesh/proto"
)

// BenchmarkDispatchTCP is BenchmarkDispatchVsRaw's tcp dispatch alone
// (F32, V2-Lite's width), for profiles of the data plane's path alone;
// it also reports the process's read and write system calls per
// dispatch (/proc/self/io) and its CPU time:
//
//	go test -run '^$' -bench DispatchTCP/rows=32 -cpuprofile cpu.out ./attnnode/
func BenchmarkDispatchTCP(b *testing.B) {
	dir := genWide(b)
	c, err := model.LoadConfig(dir)
	if err != nil {
		b.Fatal(err)
	}
	table, _ := startExperts(b, dir, 1)
	benchTCPRows(b, c, table, func() func(b *testing.B) {
		r0, w0 := sysCalls()
		return func(b *testing.B) {
			r1, w1 := sysCalls()
			b.ReportMetric(float64(r1-r0)/float64(b.N), "reads/op")
			b.ReportMetric(float64(w1-w0)/float64(b.N), "writes/op")
		}
	})
}

// benchTCPRows runs the dispatch benchmarks' loop at 1, 8 and 32 rows on
// the tcp data plane to table's expert node: 20 dispatches to warm up,
// then b.N timed, reporting compute-ns/op (the expert's, as it reports
// it) and cpu-ns/op (this process's). mark runs just before the timed
// dispatches and what it returns just after, for the caller's metrics.
func benchTCPRows(b *testing.B, c *model.Config, table *placement.Table, mark func() func(b *testing.B)) {
	for _, rows := range []int{1, 8, 32} {
		b.Run(fmt.Sprintf("rows=%d", rows), func(b *testing.B) {
			rt := NewRemoteExperts(placement.NewStatic(table), c.HiddenSize, RemoteConfig{Wire: meshpb.DType_DTYPE_F32, Transport: TransportTCP})
			defer rt.Close()
			ctx := context.WithValue(context.Background(), pinKey{}, rt.beginStep())
			batch := newRoutedBatch(b, c, table, rows)
			for range 20 {
				batch.dispatch(b, ctx, rt)
			}
			rt.computeUS.Store(0)
			c0 := cpuNS()
			report := mark()
			b.ResetTimer()
			for range b.N {
				batch.dispatch(b, ctx, rt)
			}
			b.StopTimer()
			report(b)
			b.ReportMetric(float64(rt.computeUS.Load())*1e3/float64(b.N), "compute-ns/op")
			b.ReportMetric(float64(cpuNS()-c0)/float64(b.N), "cpu-ns/op")
		})
	}
}

// BenchmarkDispatchTCPApart is BenchmarkDispatchTCP with the expert node
// in another process (this test binary again, as TestExpertProcess), as
// in a deployment: no thread of the attention side runs the expert's
// compute. cpu-ns/op is the attention process's CPU alone,
// expert-cpu-ns/op the expert process's (/proc, 10 ms ticks).
func BenchmarkDispatchTCPApart(b *testing.B) {
	dir := genWide(b)
	c, err := model.LoadConfig(dir)
	if err != nil {
		b.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestExpertProcess$")
	cmd.Env = append(os.Environ(), "EXPERTMESH_EXPERT_PROCESS="+dir)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() {
		stdin.Close()
		cmd.Wait()
	}()
	addr, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		b.Fatal(err)
	}
	go io.Copy(io.Discard, stdout)
	table, err := placement.ParseSpec(placement.ShapeOf(c), strings.TrimSpace(addr)+"=all")
	if err != nil {
		b.Fatal(err)
	}
	benchTCPRows(b, c, table, func() func(b *testing.B) {
		e0 := procCPU(cmd.Process.Pid)
		return func(b *testing.B) {
			b.ReportMetric(float64(procCPU(cmd.Process.Pid)-e0)/float64(b.N), "expert-cpu-ns/op")
		}
	})
}

// TestExpertProcess is BenchmarkDispatchTCPApart's expert node: it
// prints its address and serves until its stdin closes.
func TestExpertProcess(t *testing.T) {
	dir := os.Getenv("EXPERTMESH_EXPERT_PROCESS")
	if dir == "" {
		t.Skip("run by BenchmarkDispatchTCPApart")
	}
	_, nodes := startExperts(t, dir, 1)
	fmt.Println(nodes[0].Addr())
	io.Copy(io.Discard, os.Stdin)
}

// procCPU is process pid's user and system CPU time so far, in ns.
func procCPU(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	u, _ := strconv.ParseInt(f[11], 10, 64)
	k, _ := strconv.ParseInt(f[12], 10, 64)
	return (u + k) * 1e7 // clock ticks of 10 ms
}

// BenchmarkRawTCP is BenchmarkDispatchVsRaw's raw round trip alone, with
// warm caches, and cold: an 8 MiB buffer cleared before each round trip
// (not timed) evicts the caches, as a dispatch's other work does. The
// CPU time of a round trip depends on it far more than on the bytes: a
// 1-row round trip cost 6.8 µs warm and 27 µs cold, a 32-row one 52 and
// 76 µs (load 1.0).
func BenchmarkRawTCP(b *testing.B) {
	dir := genWide(b)
	c, err := model.LoadConfig(dir)
	if err != nil {
		b.Fatal(err)
	}
	for _, cold := range []bool{false, true} {
		for _, rows := range []int{1, 8, 32} {
			b.Run(fmt.Sprintf("cold=%v/rows=%d", cold, rows), func(b *testing.B) {
				lis, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					b.Fatal(err)
				}
				defer lis.Close()
				h := c.HiddenSize
				x := make([]float32, rows*h)
				tn := &meshpb.Tensor{Dtype: meshpb.DType_DTYPE_F32, Shape: []int64{int64(rows), int64(h)}, Data: wire.AppendRows(nil, meshpb.DType_DTYPE_F32, x)}
				reqBytes := proto.Size(&meshpb.DispatchRequest{Id: 1 << 40, Hidden: tn, K: 1, ExpertIds: make([]int32, rows), GateWeights: make([]float32, rows)})
				respBytes := proto.Size(&meshpb.DispatchResponse{Id: 1 << 40, Partial: tn, ComputeUs: 1000})
				conn, done := rawEcho(b, lis, reqBytes, respBytes)
				out, in := make([]byte, reqBytes), make([]byte, respBytes)
				scratch := make([]byte, 8<<20)
				var cpu int64
				r0, w0 := sysCalls()
				b.ResetTimer()
				for range b.N {
					if cold {
						clear(scratch)
					}
					c0 := cpuNS()
					if _, err := conn.Write(out); err != nil {
						b.Fatal(err)
					}
					if _, err := io.ReadFull(conn, in); err != nil {
						b.Fatal(err)
					}
					cpu += cpuNS() - c0
				}
				b.StopTimer()
				r1, w1 := sysCalls()
				conn.Close()
				<-done
				b.ReportMetric(float64(r1-r0)/float64(b.N), "reads/op")
				b.ReportMetric(float64(w1-w0)/float64(b.N), "writes/op")
				b.ReportMetric(float64(cpu)/float64(b.N), "cpu-ns/op")
			})
		}
	}
}

// sysCalls is the process's read and write system calls so far.
func sysCalls() (r, w int64) {
	b, err := os.ReadFile("/proc/self/io")
	if err != nil {
		return 0, 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		k, v, _ := strings.Cut(l, ": ")
		n, _ := strconv.ParseInt(v, 10, 64)
		switch k {
		case "syscr":
			r = n
		case "syscw":
			w = n
		}
	}
	return r, w
}
