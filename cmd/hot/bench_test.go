package main

import (
	"slices"
	"testing"
)

func TestParseSizesMB(t *testing.T) {
	got, err := parseSizesMB("10M, 256m,1G,64")
	if err != nil || !slices.Equal(got, []int{10, 256, 1024, 64}) {
		t.Fatalf("parseSizesMB = %v, %v", got, err)
	}
	for _, bad := range []string{"", "ten", "1T", "-5M"} {
		if _, err := parseSizesMB(bad); err == nil {
			t.Errorf("parseSizesMB(%q) accepted", bad)
		}
	}
}
