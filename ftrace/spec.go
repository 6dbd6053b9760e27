package ftrace

import (
	"fmt"
	"maps"
	"slices"
	"strings"
)

// Spec is a parsed, normalised fix spec: one built-in kind and its parameters. String
// returns the canonical form, which is what identifies a fix (same canonical spec, same
// fix).
//
// Syntax: KIND:key=value,key=value (values cannot contain commas). Example:
//
//	sock-create-deny:family=inet6,cgroup=/sys/fs/cgroup/unified/web
type Spec struct {
	Kind   string
	Params map[string]string
}

// String returns the canonical spec: the kind, then the parameters sorted by key, with
// defaults filled in and values in their canonical spelling.
func (s Spec) String() string {
	keys := slices.Sorted(maps.Keys(s.Params))
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, k+"="+s.Params[k])
	}
	return s.Kind + ":" + strings.Join(parts, ",")
}

// ParseSpec parses and validates a fix spec without touching the system. Errors match
// ErrBadSpec and say which part is wrong and what is accepted.
func ParseSpec(text string) (Spec, error) {
	text = strings.TrimSpace(text)
	if text == "" {
		return Spec{}, specErr(text, "see 'hot hotfix apply --help' for the kinds", "empty spec")
	}
	kindName, rest, _ := strings.Cut(text, ":")
	k, ok := lookupKind(kindName)
	if !ok {
		return Spec{}, specErr(text, "known kinds: "+strings.Join(kindNames(), ", "), "unknown fix kind %q", kindName)
	}
	params := map[string]string{}
	if strings.TrimSpace(rest) != "" {
		for _, kv := range strings.Split(rest, ",") {
			key, val, ok := strings.Cut(kv, "=")
			key, val = strings.TrimSpace(key), strings.TrimSpace(val)
			if !ok || key == "" {
				return Spec{}, specErr(text, "write parameters as key=value separated by commas", "parameter %q has no value", kv)
			}
			if _, dup := params[key]; dup {
				return Spec{}, specErr(text, "give each parameter once", "parameter %q given twice", key)
			}
			params[key] = val
		}
	}
	known := map[string]Param{}
	for _, p := range k.Params {
		known[p.Name] = p
	}
	for key := range params {
		if _, ok := known[key]; !ok {
			return Spec{}, specErr(text, kindParamHint(k), "unknown parameter %q for %s", key, k.Name)
		}
	}
	for _, p := range k.Params {
		v, given := params[p.Name]
		switch {
		case !given && p.Required:
			return Spec{}, specErr(text, kindParamHint(k), "%s needs parameter %q (%s)", k.Name, p.Name, p.Help)
		case !given && p.Default != "":
			params[p.Name] = p.Default
		case given && v == "":
			return Spec{}, specErr(text, kindParamHint(k), "parameter %q is empty", p.Name)
		}
		if v, ok := params[p.Name]; ok && p.normalize != nil {
			norm, err := p.normalize(v)
			if err != nil {
				return Spec{}, specErr(text, p.Help, "parameter %s=%s: %v", p.Name, v, err)
			}
			params[p.Name] = norm
		}
	}
	s := Spec{Kind: k.Name, Params: params}
	if k.check != nil {
		if err := k.check(s); err != nil {
			return Spec{}, specErr(text, kindParamHint(k), "%v", err)
		}
	}
	return s, nil
}

func kindParamHint(k Kind) string {
	names := make([]string, 0, len(k.Params))
	for _, p := range k.Params {
		n := p.Name
		if !p.Required {
			n = "[" + n + "]"
		}
		names = append(names, n)
	}
	return fmt.Sprintf("%s takes %s; example: %s", k.Name, strings.Join(names, ","), k.Example)
}

func lookupKind(name string) (Kind, bool) {
	for _, k := range Kinds() {
		if k.Name == name {
			return k, true
		}
	}
	return Kind{}, false
}

func kindNames() []string {
	var names []string
	for _, k := range Kinds() {
		names = append(names, k.Name)
	}
	return names
}
