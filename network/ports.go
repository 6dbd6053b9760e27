package network

import (
	"fmt"
	"strconv"
	"strings"
)

// PortMapping publishes ContainerPort of a container on HostPort of every host address.
type PortMapping struct {
	HostPort      uint16 `json:"hostPort"`
	ContainerPort uint16 `json:"containerPort"`
	Proto         string `json:"proto"` // "tcp" or "udp"
}

// String renders the mapping the way ParsePortMapping reads it: "8080:80/tcp".
func (p PortMapping) String() string {
	return fmt.Sprintf("%d:%d/%s", p.HostPort, p.ContainerPort, p.Proto)
}

// ParsePortMapping reads "HOSTPORT:PORT" or "HOSTPORT:PORT/PROTO" (PROTO tcp or udp, tcp by
// default), as given to `hot run -p`.
func ParsePortMapping(s string) (PortMapping, error) {
	const fix = "use HOSTPORT:PORT[/tcp|udp] with ports 1-65535, e.g. -p 8080:80"
	spec, proto, hasProto := strings.Cut(s, "/")
	if !hasProto {
		proto = "tcp"
	}
	proto = strings.ToLower(proto)
	if proto != "tcp" && proto != "udp" {
		return PortMapping{}, fmt.Errorf("port mapping %q: protocol %q is not tcp or udp: %s", s, proto, fix)
	}
	hs, cs, ok := strings.Cut(spec, ":")
	if !ok || strings.Contains(cs, ":") {
		return PortMapping{}, fmt.Errorf("port mapping %q: want one HOSTPORT:PORT pair (binding to one host address is not supported): %s", s, fix)
	}
	host, err := parsePort(hs)
	if err != nil {
		return PortMapping{}, fmt.Errorf("port mapping %q: host port: %v: %s", s, err, fix)
	}
	ctr, err := parsePort(cs)
	if err != nil {
		return PortMapping{}, fmt.Errorf("port mapping %q: container port: %v: %s", s, err, fix)
	}
	return PortMapping{HostPort: host, ContainerPort: ctr, Proto: proto}, nil
}

func parsePort(s string) (uint16, error) {
	if s == "" {
		return 0, fmt.Errorf("empty")
	}
	v, err := strconv.ParseUint(s, 10, 16)
	if err != nil || v == 0 {
		return 0, fmt.Errorf("%q is not a number from 1 to 65535", s)
	}
	return uint16(v), nil
}

// validatePorts checks a list for bad protocols and duplicate host ports.
func validatePorts(ports []PortMapping) error {
	seen := map[string]bool{}
	for _, p := range ports {
		if p.HostPort == 0 || p.ContainerPort == 0 || (p.Proto != "tcp" && p.Proto != "udp") {
			return fmt.Errorf("port mapping %s: ports must be 1-65535 and the protocol tcp or udp", p)
		}
		k := fmt.Sprintf("%d/%s", p.HostPort, p.Proto)
		if seen[k] {
			return fmt.Errorf("host port %s is published twice: give each -p its own host port", k)
		}
		seen[k] = true
	}
	return nil
}
