package update

import (
	"slices"
	"testing"

	"github.com/hotctl/hot/container"
)

// A second update must carry the uppers the first one carried, not only the running upper.
func TestCarriedLayers(t *testing.T) {
	g := &container.Generation{
		LowerDirs: []string{"/var/lib/hot/layers/aaa", "/var/lib/hot/layers/bbb", "/var/lib/hot/containers/c1/generations/1/upper"},
		Upper:     "/var/lib/hot/containers/c1/generations/2/upper",
	}
	want := []string{"/var/lib/hot/containers/c1/generations/1/upper", "/var/lib/hot/containers/c1/generations/2/upper"}
	if got := carriedLayers(g); !slices.Equal(got, want) {
		t.Errorf("carriedLayers = %v, want %v", got, want)
	}
	first := &container.Generation{LowerDirs: []string{"/var/lib/hot/layers/aaa"}, Upper: "/var/lib/hot/containers/c1/generations/1/upper"}
	if got := carriedLayers(first); !slices.Equal(got, []string{first.Upper}) {
		t.Errorf("carriedLayers(first generation) = %v", got)
	}
}
