package migrate

import (
	"bufio"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strings"

	"github.com/hotctl/hot/checkpoint"
	"github.com/hotctl/hot/container"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// API paths of the agent. Every request carries "Authorization: Bearer TOKEN".
const (
	PathPreflight = "/v1/preflight"  // POST PreflightRequest → PreflightResponse
	PathImage     = "/v1/image"      // POST an OCI archive (cowfs.Store.Export) → ImageResponse
	PathMigration = "/v1/migrations" // POST the migration stream (a tar, see Manifest) → Result
)

// Members of the migration stream, in this order; the manifest comes last, once every
// member's digest is known.
const (
	memberState    = "state.json"
	memberImages   = "images/" // images/<file>: the CRIU images directory, flat
	memberUpper    = "upper.tar"
	memberLower    = "lower-%d.tar" // earlier generations' uppers stacked below the upper
	memberManifest = "manifest.json"
)

// maxStateSize bounds state.json and manifest.json, which the receiver reads into memory.
const maxStateSize = 16 << 20

// HostFacts are what preflight compares between the two hosts.
type HostFacts struct {
	CRIUVersion string   `json:"criuVersion"`
	Kernel      string   `json:"kernel"`
	Arch        string   `json:"arch"`
	CPUFlags    []string `json:"cpuFlags"`
}

// PreflightRequest is what the source asks before anything is stopped.
type PreflightRequest struct {
	Name    string          `json:"name"`
	Image   string          `json:"image"`
	ImageID digest.Digest   `json:"imageId"`
	DiffIDs []digest.Digest `json:"diffIds"`
	IP      netip.Addr      `json:"ip,omitzero"`
	Bridge  string          `json:"bridge,omitempty"`
	Subnet  netip.Prefix    `json:"subnet,omitzero"`
	Lazy    bool            `json:"lazy,omitempty"`
	Source  HostFacts       `json:"source"`
}

// PreflightResponse is the target's verdict. Problems is empty when the migration may go on;
// MissingLayers (diffIDs) say what the source must push first.
type PreflightResponse struct {
	Target        HostFacts       `json:"target"`
	HaveImage     bool            `json:"haveImage"`
	MissingLayers []digest.Digest `json:"missingLayers,omitempty"`
	Problems      []string        `json:"problems,omitempty"`
}

// ImageResponse answers a pushed image.
type ImageResponse struct {
	ImageID digest.Digest `json:"imageId"`
	Bytes   int64         `json:"bytes"`
}

// ErrorResponse is the body of every non-2xx answer.
type ErrorResponse struct {
	Error string `json:"error"`
}

// State is the container as the target recreates it (member state.json).
type State struct {
	Name        string                    `json:"name"`
	Image       string                    `json:"image"`
	ImageID     digest.Digest             `json:"imageId"`
	Generation  int                       `json:"generation"`
	ExtraLowers int                       `json:"extraLowers"` // lower-N.tar members, bottom first
	Network     container.NetworkState    `json:"network"`
	Resources   container.Resources       `json:"resources"`
	Spec        *specs.Spec               `json:"spec"`
	NetnsKey    string                    `json:"netnsKey,omitempty"`
	Externals   []checkpoint.ExternalFile `json:"externals,omitempty"`
	CRIUVersion string                    `json:"criuVersion"`
	// Lazy: the images hold no memory pages; the target pulls them from the page server at
	// PageServer (host:port) on the source while the restored processes run.
	Lazy       bool   `json:"lazy,omitempty"`
	PageServer string `json:"pageServer,omitempty"`
}

// Member is one entry of the stream as the manifest lists it.
type Member struct {
	Name   string `json:"name"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

// Manifest closes the stream: every member with its size and SHA-256, and MAC, an
// HMAC-SHA256 keyed with the shared token over the members' canonical JSON. A stream altered
// on the way (a member changed, dropped, added or reordered, or the manifest rewritten) is
// refused even without TLS.
type Manifest struct {
	Members []Member `json:"members"`
	MAC     string   `json:"mac"`
}

func manifestMAC(token []byte, members []Member) string {
	b, _ := json.Marshal(members)
	m := hmac.New(sha256.New, token)
	m.Write(b)
	return hex.EncodeToString(m.Sum(nil))
}

// verify checks the MAC and that got (what the receiver read, in order) is exactly the list
// the manifest announces.
func (m *Manifest) verify(token []byte, got []Member) error {
	want := manifestMAC(token, m.Members)
	if subtle.ConstantTimeCompare([]byte(want), []byte(m.MAC)) != 1 {
		return errors.New("the manifest's MAC does not match: the stream was altered on the way or the sender has another token")
	}
	if len(got) != len(m.Members) {
		return fmt.Errorf("the stream has %d members, the manifest lists %d", len(got), len(m.Members))
	}
	for i, g := range got {
		w := m.Members[i]
		if g.Name != w.Name {
			return fmt.Errorf("member %d is %q, the manifest lists %q", i, g.Name, w.Name)
		}
		if g.Size != w.Size || g.SHA256 != w.SHA256 {
			return fmt.Errorf("member %s: received %d bytes with sha256 %s, the manifest says %d bytes with sha256 %s", g.Name, g.Size, g.SHA256, w.Size, w.SHA256)
		}
	}
	return nil
}

var imageFileName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// LoadToken reads a token file: one line, at least 16 characters.
func LoadToken(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read token file: %w", err)
	}
	t := strings.TrimSpace(string(b))
	if len(t) < 16 {
		return nil, fmt.Errorf("token file %s: the token must be at least 16 characters (e.g. 'openssl rand -hex 32 > %s')", path, path)
	}
	return []byte(t), nil
}

// tokenEqual compares in constant time (over SHA-256 sums, so the length leaks nothing).
func tokenEqual(a, b []byte) bool {
	x, y := sha256.Sum256(a), sha256.Sum256(b)
	return subtle.ConstantTimeCompare(x[:], y[:]) == 1
}

// TLSFiles name the PEM files of mutual TLS; all empty means plain TCP.
type TLSFiles struct {
	Cert, Key, CA string
}

func (f TLSFiles) enabled() bool { return f.Cert != "" || f.Key != "" || f.CA != "" }

// config builds a TLS config that presents Cert/Key and requires the peer to present a
// certificate signed by CA (server: client certificates required; client: server verified).
func (f TLSFiles) config(server bool) (*tls.Config, error) {
	if f.Cert == "" || f.Key == "" || f.CA == "" {
		return nil, errors.New("mutual TLS needs all of --tls-cert, --tls-key and --tls-ca")
	}
	cert, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		return nil, fmt.Errorf("load TLS key pair %s, %s: %w", f.Cert, f.Key, err)
	}
	pem, err := os.ReadFile(f.CA)
	if err != nil {
		return nil, fmt.Errorf("read TLS CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("TLS CA %s holds no PEM certificate", f.CA)
	}
	c := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13}
	if server {
		c.ClientCAs, c.ClientAuth = pool, tls.RequireAndVerifyClientCert
	} else {
		c.RootCAs = pool
	}
	return c, nil
}

// LocalFacts reads this host's facts: kernel release and architecture (uname), the CPU
// flags of the first processor in /proc/cpuinfo, and the CRIU version given.
func LocalFacts(criuVersion string) (HostFacts, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return HostFacts{}, fmt.Errorf("uname: %w", err)
	}
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return HostFacts{}, fmt.Errorf("read CPU flags: %w", err)
	}
	defer f.Close()
	flags, err := parseCPUFlags(bufio.NewScanner(f))
	if err != nil {
		return HostFacts{}, err
	}
	return HostFacts{CRIUVersion: criuVersion, Kernel: unix.ByteSliceToString(u.Release[:]),
		Arch: unix.ByteSliceToString(u.Machine[:]), CPUFlags: flags}, nil
}

// parseCPUFlags returns the sorted "flags" of the first processor in /proc/cpuinfo.
func parseCPUFlags(sc *bufio.Scanner) ([]string, error) {
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok && strings.TrimSpace(k) == "flags" {
			fl := strings.Fields(v)
			slices.Sort(fl)
			return slices.Compact(fl), nil
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read /proc/cpuinfo: %w", err)
	}
	return nil, errors.New("/proc/cpuinfo has no flags line")
}

// missingFlags lists the source's CPU flags the target lacks: a restored process may have
// chosen code paths (e.g. glibc's ifuncs, a JIT) by them, and would die of SIGILL.
func missingFlags(source, target []string) []string {
	have := map[string]bool{}
	for _, f := range target {
		have[f] = true
	}
	var out []string
	for _, f := range source {
		if !have[f] {
			out = append(out, f)
		}
	}
	return out
}
