package checkpoint

import (
	"encoding/binary"
	"testing"
)

func TestIPFromWords(t *testing.T) {
	word := func(b ...byte) uint32 { return binary.LittleEndian.Uint32(b) }
	for _, tc := range []struct {
		w    []uint32
		want string
	}{
		{[]uint32{word(10, 197, 95, 2)}, "10.197.95.2"},
		{[]uint32{0, 0, word(0, 0, 0xff, 0xff), word(10, 197, 95, 1)}, "10.197.95.1"}, // v4-mapped
		{[]uint32{word(0xfd, 0, 0, 0), 0, 0, word(0, 0, 0, 1)}, "fd00::1"},
		{[]uint32{0, 0, 0, 0}, "::"},
	} {
		if got := ipFromWords(tc.w).String(); got != tc.want {
			t.Errorf("ipFromWords(%x) = %s, want %s", tc.w, got, tc.want)
		}
	}
}
