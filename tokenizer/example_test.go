package tokenizer_test

import (
	"fmt"

	"github.com/expertmesh/expertmesh/tokenizer"
)

func Example() {
	tok, err := tokenizer.Load("testdata/deepseek-v3")
	if err != nil {
		panic(err)
	}
	prompt, err := tok.ApplyChatTemplate([]tokenizer.Message{
		{Role: "system", Content: "Be brief."},
		{Role: "user", Content: "Hello!"},
	}, true)
	if err != nil {
		panic(err)
	}
	ids := tok.Encode(prompt, false) // the template already wrote the BOS (ids checked with HF)
	fmt.Printf("%q\n%v\n", prompt, ids)

	// Stream a reply back one id at a time: " 👋" is two tokens, the first
	// holding the space and three of the emoji's four bytes.
	s := tok.NewStream(true)
	for _, id := range append(tok.Encode("Hi 👋", false), 1) { // 1 = EOS
		fmt.Printf("%q ", s.Add(id))
	}
	fmt.Printf("%q\n", s.Flush())
	// Output:
	// "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hello!<｜Assistant｜>"
	// [0 7153 9708 16 128803 19923 3 128804]
	// "Hi" " " "👋" "" ""
}
