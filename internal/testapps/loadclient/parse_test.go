package loadclient

import "testing"

func TestParseAnswer(t *testing.T) {
	for _, tc := range []struct {
		body string
		v    int64
		ver  string
	}{
		{"count 42\n", 42, ""},
		{"demo v2 count=7 pid=1\n", 7, "v2"},
	} {
		v, ver, err := parseAnswer(tc.body)
		if err != nil || v != tc.v || ver != tc.ver {
			t.Errorf("parseAnswer(%q) = %d %q %v; want %d %q", tc.body, v, ver, err, tc.v, tc.ver)
		}
	}
	if _, _, err := parseAnswer("hello"); err == nil {
		t.Error("a body without a counter must be an error")
	}
}
