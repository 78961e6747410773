package tokenizer

import (
	"strings"
	"syscall"
	"testing"
	"time"
)

// cpuClock measures the process's CPU time (user+system, GC included), so
// that throughput per CPU-second stays meaningful on a loaded machine where
// wall-clock MB/s does not.
type cpuClock time.Duration

func cpuNow() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func startCPU() cpuClock { return cpuClock(cpuNow()) }

func (c cpuClock) report(b *testing.B, bytesPerOp int) {
	if d := cpuNow() - time.Duration(c); d > 0 {
		b.ReportMetric(float64(bytesPerOp)*float64(b.N)/d.Seconds()/1e6, "MB/cpu-s")
	}
}

// mixedCorpus is about 1 MB of English prose, code, CJK, Cyrillic, emoji,
// numbers and whitespace runs, built from the oracle texts plus longer
// natural passages so that BPE cache hits are realistic.
func mixedCorpus(tb testing.TB) string {
	var b strings.Builder
	prose := "The mixture-of-experts layer routes each token to eight of 256 experts; " +
		"the coordinator batches requests, and attention nodes keep the latent cache in paged blocks.\n"
	code := "func (s *Server) Handle(ctx context.Context, req *Request) (*Response, error) {\n\tif err := req.Validate(); err != nil {\n\t\treturn nil, fmt.Errorf(\"bad request: %w\", err)\n\t}\n\treturn s.next.Handle(ctx, req)\n}\n"
	cjk := "深度求索的模型使用混合专家架构。日本語の文章も含まれています。한국어 문장도 있습니다.\n"
	other := "Привет, мир! Ελληνικά κείμενα. 🚀🦙✅ 3.14159 2024-11-23 1,000,000   indented\n\n"
	for _, e := range readOracle(tb) {
		b.WriteString(e.Text)
		b.WriteByte('\n')
	}
	for b.Len() < 1<<20 {
		b.WriteString(prose)
		b.WriteString(code)
		b.WriteString(cjk)
		b.WriteString(other)
	}
	return b.String()
}

func BenchmarkEncode(b *testing.B) {
	text := mixedCorpus(b)
	for _, m := range []struct{ name, dir string }{{"v3", v3Dir}, {"v2", v2Dir}} {
		b.Run(m.name, func(b *testing.B) {
			tok := load(b, m.dir)
			tok.Encode(text, false) // warm the word cache, as a server would be
			b.SetBytes(int64(len(text)))
			cpu := startCPU()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				tok.Encode(text, false)
			}
			cpu.report(b, len(text))
		})
	}
}

func BenchmarkDecode(b *testing.B) {
	text := mixedCorpus(b)
	for _, m := range []struct{ name, dir string }{{"v3", v3Dir}, {"v2", v2Dir}} {
		b.Run(m.name, func(b *testing.B) {
			tok := load(b, m.dir)
			ids := tok.Encode(text, false)
			b.SetBytes(int64(len(text)))
			cpu := startCPU()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				tok.Decode(ids, false)
			}
			cpu.report(b, len(text))
		})
	}
}

func BenchmarkStream(b *testing.B) {
	text := mixedCorpus(b)
	tok := load(b, v3Dir)
	ids := tok.Encode(text, false)
	b.SetBytes(int64(len(text)))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		s := tok.NewStream(false)
		for _, id := range ids {
			s.Add(id)
		}
		s.Flush()
	}
}

// TestEncodeLinear encodes long degenerate inputs that defeat the
// pre-tokenizer (one huge piece) and the word cache. A quadratic BPE or
// regex would take minutes on these; the budget is generous for slow CI.
func TestEncodeLinear(t *testing.T) {
	const n = 200_000
	v2, v3 := load(t, v2Dir), load(t, v3Dir)
	for _, in := range []string{
		strings.Repeat("a", n),
		strings.Repeat(" ", n),
		strings.Repeat("\n", n),
		strings.Repeat("!", n),
		strings.Repeat("7", n),
		strings.Repeat("中", n/3),
		strings.Repeat("ab", n/2),
		strings.Repeat("\xff", n),
		strings.Repeat("<｜", n/6),
		strings.Repeat("<｜User｜>", n/15),
	} {
		for _, tok := range []*Tokenizer{v2, v3} {
			start := time.Now()
			ids := tok.Encode(in, false)
			if el := time.Since(start); el > 10*time.Second {
				t.Errorf("%q x%d: %v", in[:min(4, len(in))], len(in), el)
			}
			if canRoundTrip(tok, in) && tok.Decode(ids, false) != in {
				t.Errorf("%q x%d: round trip failed", in[:min(4, len(in))], len(in))
			}
		}
	}
}

// BenchmarkChatPrompt is the per-request cost of a short chat: render the
// template and encode the prompt.
func BenchmarkChatPrompt(b *testing.B) {
	tok := load(b, v3Dir)
	msgs := []Message{
		{"system", "You are a helpful assistant. Answer concisely."},
		{"user", "What is a mixture-of-experts model, and why does DeepSeek-V3 use 256 routed experts?"},
	}
	for i := 0; i < b.N; i++ {
		p, err := tok.ApplyChatTemplate(msgs, true)
		if err != nil {
			b.Fatal(err)
		}
		tok.Encode(p, false)
	}
}

// BenchmarkEncodeParallel encodes chat-sized texts from all Ps at once,
// sharing one Tokenizer and its word cache.
func BenchmarkEncodeParallel(b *testing.B) {
	tok := load(b, v3Dir)
	entries := readOracle(b)
	total := 0
	for _, e := range entries {
		total += len(e.Text)
	}
	b.SetBytes(int64(total / len(entries)))
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			tok.Encode(entries[i%len(entries)].Text, false)
			i++
		}
	})
}
